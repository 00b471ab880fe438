"""Documents → answers: retrieval (index), the prompt layout, synthetic questions, side-by-side eval."""
