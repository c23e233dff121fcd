"""The volunteer client of Hivewire."""
