from qvlc.cli import main

main()
