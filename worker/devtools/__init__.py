"""Developer tools: the fake iVvy (a real HTTP server) and the demo built on it."""
