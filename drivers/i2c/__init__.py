"""drivers.i2c"""
