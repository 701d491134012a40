"""socks room of postbridge."""
