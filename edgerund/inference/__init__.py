"""edgerund.inference"""
