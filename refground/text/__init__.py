"""Text: tokenisation and vocabularies shared by the methods."""
