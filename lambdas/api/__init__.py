"""The API Lambda: every front door behind one Powertools resolver."""
