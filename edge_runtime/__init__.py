"""Edge runtime: what runs on a board. Its core imports without torch."""
