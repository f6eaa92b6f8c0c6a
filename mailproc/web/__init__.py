"""The agent console and JSON API, on the same services as the command line."""
