"""Package data: the built-in evaluation text (chapters 1-4 of Austen's *Persuasion*, public domain)."""
