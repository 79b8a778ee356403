"""The lab: code that runs the product against the simulated shop and compares it with the truth.

It imports the product (stages, allocation, models) and the simulator; nothing in the product
imports it.
"""
