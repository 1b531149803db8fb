"""The faces people and programs use: the command line (later the HTTP API and the web page).

Thin: each calls the functions below it and shows what they return; none reads the spool tree
itself. Above every layer but the composition root.
"""
