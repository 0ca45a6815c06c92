from dstackctl.cli.entry import main

main()
