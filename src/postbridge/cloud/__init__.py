"""cloud room of postbridge."""
