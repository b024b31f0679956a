from medres.cli import main

main()
