"""mail room: the mail adapter (connection, IMAP, POP3, SMTP, protections, polling)."""
