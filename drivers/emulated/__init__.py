"""drivers.emulated"""
