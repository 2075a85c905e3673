"""Chat with a built model: chat templates, character cards, streamed replies."""
