from streamtune.cli import main

main()
