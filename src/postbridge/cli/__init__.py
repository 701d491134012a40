"""cli room of postbridge."""
