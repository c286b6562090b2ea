from evomerge.zoo.build import main

main()
