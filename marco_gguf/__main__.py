from marco_gguf.cli import main

main()
