"""The triggers service: evaluates retention rules on score changes and delivers actions as signed webhooks."""
