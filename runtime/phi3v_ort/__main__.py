from phi3v_ort.cli import main

main()
