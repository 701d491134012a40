"""``postbridge demo``: the tunnel story told in one process on 127.0.0.1, step by step, with its own checks.

Modules: :mod:`~postbridge.demo.command` (the command, home folder, logging, exit codes),
:mod:`~postbridge.demo.story` (the steps and what each expects), :mod:`~postbridge.demo.onprem` (the tiny
"on-premise" mail-like server and its demo CA), :mod:`~postbridge.demo.dialogue` (the client side) and
:mod:`~postbridge.demo.narration` (how it all looks on the terminal).
"""
