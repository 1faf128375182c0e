from phi3v_ort.cli.commands import main

main()
