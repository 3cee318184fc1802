"""One POST to a chat-completions endpoint: client, transport, streamed answers, redaction."""
