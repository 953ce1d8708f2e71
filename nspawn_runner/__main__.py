from nspawn_runner.main import main

main()
