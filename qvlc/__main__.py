from qvlc.cli.launch import main

main()
