"""Text around token ids: the chat template and stop ids, the streaming detokenizer."""
