from qvlc.entry import main

main()
