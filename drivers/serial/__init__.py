"""drivers.serial"""
