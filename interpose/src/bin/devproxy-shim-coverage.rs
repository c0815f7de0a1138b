//! Prints how much of the driver API the shim implements.
fn main() {
    println!("{}", devproxy_interpose::coverage_line());
}
