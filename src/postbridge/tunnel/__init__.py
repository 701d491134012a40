"""tunnel room of postbridge."""
