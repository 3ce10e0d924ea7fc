"""The call core: speech in -> transcripts -> answers -> speech out, knowing no wire protocol and no model library."""
