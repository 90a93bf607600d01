"""Front doors: public HTTP in, core operations, outcomes back out as HTTP."""
