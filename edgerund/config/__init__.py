"""edgerund.config"""
