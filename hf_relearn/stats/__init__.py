"""Numbers in, numbers out, no torch: summaries of observed values, censored costs (Kaplan-Meier) and tests that
count trained bases, and the warnings a result's numbers raise."""
