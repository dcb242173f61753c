"""What the tutor is taught: the pre-training corpus generator, the concept notes and the bundled
SFT/preference data built from them (data/)."""
