"""Fault injection: mover processes killed, cut off and raced while events flow."""
