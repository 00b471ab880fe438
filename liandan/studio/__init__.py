"""`liandan studio`: the whole workflow (data, training, test, chat, export) in a local web page.

The page calls the same functions as the CLI; training runs as a real `liandan lora` process.
"""
