"""Serving: the native protocol and server, the OpenAI endpoint, the service they share, the client, the Ray job."""
