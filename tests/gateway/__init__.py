"""The gateway: routing, fusion answers, fail fast; servicers in process."""
