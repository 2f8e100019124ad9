from ttaserve.cli import main

main()
