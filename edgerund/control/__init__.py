"""edgerund.control"""
