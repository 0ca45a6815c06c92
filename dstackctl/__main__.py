from dstackctl.cli.main import main

main()
