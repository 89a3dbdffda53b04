"""Console: the customer-360 read model and the web pages over it."""
