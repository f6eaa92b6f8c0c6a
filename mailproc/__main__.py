from mailproc.cli import main

main()
