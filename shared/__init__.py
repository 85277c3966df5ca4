"""What every shallow process shares: settings, the job/stream protocol, the session store, prompts, model sources."""
