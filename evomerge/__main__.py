from evomerge.cli import main

main()
