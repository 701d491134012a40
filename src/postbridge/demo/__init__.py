"""``postbridge demo``: the whole story told in one process on 127.0.0.1, step by step, with its own checks.

Modules: :mod:`~postbridge.demo.command` (the command, home folder, logging, signals, exit codes),
:mod:`~postbridge.demo.stage` (the lab server, hub and connector it starts), :mod:`~postbridge.demo.story` (the
steps and what each expects), :mod:`~postbridge.demo.cases` (names and the classic errors),
:mod:`~postbridge.demo.mailflow` (mail through the tunnel and the flow), :mod:`~postbridge.demo.serve` (the
keep-running phase) and :mod:`~postbridge.demo.narration` (how it all looks on the terminal).
"""
