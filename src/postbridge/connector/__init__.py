"""connector room of postbridge."""
