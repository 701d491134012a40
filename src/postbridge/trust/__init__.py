"""trust room of postbridge."""
